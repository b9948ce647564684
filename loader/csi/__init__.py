"""model-cache's CSI node plugin: inline ephemeral volumes that mount a model from the node cache, read-only.

    csi.proto, csi_pb2*.py[i]  the CSI v1 subset served (generated modules committed; see the proto's header)
    request.py                 pure: a NodePublish/NodeUnpublish request -> a typed value, or InvalidArgument
    codes.py                   pure: a loader error -> the gRPC status the CSI spec's error tables ask for
    mounts.py                  the mount table (/proc/self/mountinfo) and bind mounts (mount(2) through libc)
    volumes.py                 one record per published volume on disk, so a restarted agent can unpublish
    jobs.py                    pulls that outlive a call: one per volume, serialised per model, awaited with a bound
    server.py                  the Identity and Node services on a unix socket; ``serve``

The pull itself is loader.pull's: the same cache layout, the access rule of ``--check-access`` and the pod's pin.
docs/csi.md says what kubelet is assumed to do and how an admin checks it on a node.
"""

from __future__ import annotations

from loader import contract

#: The driver name: a pod's ``volumes[].csi.driver``, the CSIDriver object's name, GetPluginInfo's ``name``. Defined
#: once, in the webhook/loader contract (the webhook writes it into pods).
DRIVER_NAME = contract.CSI_DRIVER
