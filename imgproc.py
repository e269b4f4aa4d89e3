#!/usr/bin/env python3
"""Run the imgproc command from a source checkout: ``python imgproc.py INPUT_DIR [OUTPUT_DIR] ...``."""

import sys

from imgproc.cli import main

if __name__ == "__main__":
    sys.exit(main())
