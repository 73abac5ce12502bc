"""Print, as JSON, the broker login of the exo node agent on this host: its user, the id the agent
will announce (argument: a given id, else derived as the agent does from /etc/machine-id and
EXO_NAME), and, in a cluster with a key (EXO_CLUSTER, EXO_CLUSTER_KEY), the password exo derives
for it (empty without a key). The key comes in the environment: an argument would show in ps."""
import json
import os
import sys

from appliance import cluster_key
from appliance.config import load_config
from appliance.node.identity import node_id

config = load_config(os.devnull)   # the EXO_* variables only, not an older /etc/exo/config.yaml
user = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else node_id(config.state_dir, config.name)
print(json.dumps({"user": user, "password": cluster_key.password(config, user) if config.cluster_key else ""}))
