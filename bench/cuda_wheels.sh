#!/usr/bin/env bash
# The pure-Python packages bench/cuda_check.py needs that the device image lacks (optuna and its needs), as
# wheels in .whl/ (ignored by git, carried by the device tool). Run here, once, before the device run:
#   bash bench/cuda_wheels.sh
# then, on the device (carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 bench/cuda_check.py --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# the device's Python is 3.12 on x86-64; the versions are this project's (pip show here)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl optuna==5.1.0 alembic==1.20.1 SQLAlchemy==2.1.9 colorlog==6.12.0 Mako==1.4.3
ls -l .whl
