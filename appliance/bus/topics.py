"""Every MQTT topic name, in one place. All live under `exo/<cluster>/`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    cluster: str = "default"

    @property
    def root(self) -> str:
        return f"exo/{self.cluster}"

    def node_info(self, node_id: str = "+") -> str:      # retained, QoS 1, Last Will
        return f"{self.root}/node/{node_id}/info"

    def node_status(self, node_id: str = "+") -> str:    # heartbeat, QoS 0
        return f"{self.root}/node/{node_id}/status"

    def node_download(self, node_id: str = "+") -> str:  # retained, QoS 1: download progress
        return f"{self.root}/node/{node_id}/download"

    def node_inbox(self, node_id: str) -> str:          # binary activation frames, QoS 0
        return f"{self.root}/node/{node_id}/in"

    @property
    def plan(self) -> str:                              # retained, QoS 1
        return f"{self.root}/plan"

    def coord_out(self, coord_id: str) -> str:          # tokens and errors back to a coordinator
        return f"{self.root}/coord/{coord_id}/out"

    def ctl(self, command: str = "#") -> str:           # QoS 1 commands: cancel, ...
        return f"{self.root}/ctl/{command}"

    def node_id_of(self, topic: str) -> str:
        """The <id> of a `.../node/<id>/...` topic."""
        parts = topic.split("/")
        return parts[parts.index("node") + 1]
