#!/usr/bin/env bash
# The emulated aarch64 Python is part of the test suite now: tests/aarch64/setup.sh builds it (see there).
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/../../tests/aarch64/setup.sh" "$@"
