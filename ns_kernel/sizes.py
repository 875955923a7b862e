"""Sizes as people write them (512M, 2G) and as the kernel shows them: in one place for
the config's validation, the plan's tmpfs options and the limits' log line."""
import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text):
    """'512M', '2G', '1.5GiB', '1048576' -> bytes; '' or '0' -> 0 (no limit)."""
    if text in ("", None):
        return 0
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 2G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size):
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit.lower()] and size % _UNITS[unit.lower()] == 0:
            return f"{size // _UNITS[unit.lower()]}{unit}"
    return str(size)
