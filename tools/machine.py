"""What the benchmarks record about the machine they ran on (one place for the /proc parsing)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (e.g. "AMD EPYC"); ``platform.processor()`` or "?" elsewhere."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_id(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """The first CPU's vendor, family, model, stepping and clock, e.g. "AuthenticAMD family 23 model 49 stepping 0,
    2246 MHz": VMs that all call themselves "AMD EPYC" differ in these, and so do their benchmark numbers. The
    fields that the file lacks are left out ("" when it has none of them or cannot be read)."""
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if not line.strip():
                if fields:
                    break  # the first processor's block only
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return ""
    parts = [fields.get("vendor_id", "")]
    parts += [f"{name} {fields[key]}" for key, name in (("cpu family", "family"), ("model", "model"),
                                                        ("stepping", "stepping")) if fields.get(key)]
    out = " ".join(p for p in parts if p)
    try:
        mhz = f"{float(fields['cpu MHz']):.0f} MHz"
    except (KeyError, ValueError):
        return out
    return f"{out}, {mhz}" if out else mhz


def cpu_fields() -> dict[str, str]:
    """This machine's CPU as every benchmark's machine block records it: ``cpu`` (the model name) and ``cpu_id``."""
    return {"cpu": cpu_model(), "cpu_id": cpu_id()}


def cpu_label(machine: dict, key: str = "cpu") -> str:
    """A machine block's CPU for a report line: the model name, with its ``cpu_id`` in brackets where recorded."""
    name, ident = machine.get(key, "?"), machine.get("cpu_id")
    return f"{name} ({ident})" if ident else str(name)


def process_cpu_s(pid: int) -> float:
    """CPU seconds a process has used so far (user + system, from ``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def memory_gib() -> float | None:
    """Physical memory in GiB (one decimal), or None where sysconf cannot tell."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return None
