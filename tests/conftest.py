import pathlib
import sys

# tests/torch_reference.py is imported as a plain module by the parity tests
sys.path.insert(0, str(pathlib.Path(__file__).parent))
