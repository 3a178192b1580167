"""Installing Debian packages from a test's setup (as root), for tools a test needs."""

from __future__ import annotations

import os
import shutil
import subprocess


def apt_install(packages: list[str]) -> str | None:
    """Install Debian packages; None on success, else why not."""
    if os.geteuid() != 0:
        return f"not root (uid {os.geteuid()}), cannot apt-get install {' '.join(packages)}"
    if shutil.which("apt-get") is None:
        return f"no apt-get on this machine to install {' '.join(packages)}"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=120"]  # another apt run waits instead of failing
    for step, timeout in (
        (["apt-get", *lock, "update", "-q"], 300),
        (["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *packages], 300),
    ):
        try:
            done = subprocess.run(step, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(step)}` took more than {timeout} s"
        if done.returncode != 0:
            tail = (done.stderr.strip() or done.stdout.strip()).splitlines()[-3:]
            return f"`{' '.join(step)}` failed ({done.returncode}): {' | '.join(tail)}"
    return None
