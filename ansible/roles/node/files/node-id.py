"""Print the id the exo node agent on this host will announce (argument: the node name)."""
import sys

from appliance.config import Config
from appliance.node.identity import node_id

print(node_id(Config().state_dir, sys.argv[1] if len(sys.argv) > 1 else ""))
