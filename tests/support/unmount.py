"""Clean-up of bind mounts a test or the demo made (CSI publishes) under a directory of its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

from loader.csi import mounts


def unmount_all_under(root: Path) -> None:
    """Lazily unmount everything mounted below ``root``, the most recent first, until nothing is (mount points read
    as the kernel escapes them, through the plugin's own mountinfo parser)."""
    for _ in range(200):
        with open(mounts.MOUNTINFO) as f:
            mine = [m.mount_point for m in mounts.parse_mountinfo(f.read())
                    if m.mount_point.startswith(str(root) + "/")]
        if not mine:
            return
        subprocess.run(["umount", "-l", mine[-1]], check=False)
