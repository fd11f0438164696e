import pathlib
import sys

# make the foreign-MEF epoch writer importable as `foreign_mef`
sys.path.insert(0, str(pathlib.Path(__file__).parent))
