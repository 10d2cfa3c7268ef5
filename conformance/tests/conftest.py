import sys
from pathlib import Path

# The repo runs pytest with --import-mode=importlib; make the reference backends importable
# (also from pytester runs, which execute in this process).
sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["pytester"]
