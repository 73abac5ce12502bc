"""Print the avahi service file that advertises this cluster's broker on the port given as the
argument: exo's own advert (appliance.discovery.avahi_service), so its hash is the one exo looks
for. The cluster comes from EXO_CLUSTER and EXO_CLUSTER_KEY in the environment."""
import os
import sys

from appliance.config import load_config
from appliance.discovery import avahi_service

print(avahi_service(load_config(os.devnull), int(sys.argv[1])), end="")
