import pathlib
import sys

# make the seeded synthetic-field helper importable as `synthetic`
sys.path.insert(0, str(pathlib.Path(__file__).parent))
