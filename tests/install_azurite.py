"""Install azurite (the Azure Blob emulator) for the tests: ``python tests/install_azurite.py DIR``.

tox runs it before pytest. Without Node.js it installs nothing and says so: the Azure
tests then skip with that reason. With Node.js a failed install fails the run, so a
broken setup never hides as skipped tests.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

#: The last azurite release that runs on Node 20.
AZURITE = "azurite@3.35.0"


def main(prefix: str) -> int:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        print(f"install_azurite: Node.js/npm not found; not installing {AZURITE}")
        return 0
    command = [npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", prefix, AZURITE]
    print(" ".join(command), flush=True)
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
