"""Print the broker password exo derives from the cluster key (EXO_CLUSTER, EXO_CLUSTER_KEY in
the environment: an argument would show in ps) for the user named by the argument."""
import os
import sys

from appliance import cluster_key
from appliance.config import load_config

print(cluster_key.password(load_config(os.devnull), sys.argv[1]))
