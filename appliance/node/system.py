"""What a node says about its machine: memory, CPU, device model, SoC temperature, throttling."""
from __future__ import annotations

import platform
import socket
from pathlib import Path

import psutil

from appliance.engines.footprint import cpu_has_float16_arithmetic

PI_MODEL = Path("/proc/device-tree/model")
PI_THROTTLED = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")
THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")


def device_model() -> str:
    try:
        return PI_MODEL.read_text().strip("\x00\n ")      # e.g. "Raspberry Pi 5 Model B Rev 1.0"
    except OSError:
        return f"{platform.system()} {platform.machine()}"


def soc_temperature() -> float | None:
    try:
        return int(THERMAL_ZONE.read_text()) / 1000
    except (OSError, ValueError):
        return None


def throttled() -> bool | None:
    """True when the Pi firmware reports under-voltage or throttling now (bits 0-3)."""
    try:
        return bool(int(PI_THROTTLED.read_text().strip(), 16) & 0xF)
    except (OSError, ValueError):
        return None


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def host_id() -> str:
    """Which machine this is, as far as memory goes: processes under one kernel share its memory
    (however many hostnames or network namespaces they have), so Linux says its boot id."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return socket.gethostname()


def machine_info() -> dict:
    memory = psutil.virtual_memory()
    return {
        "hostname": socket.gethostname(),
        "host_id": host_id(),
        "device_model": device_model(),
        "cpu_count": psutil.cpu_count(),
        "memory_total": memory.total,
        "memory_available": memory.available,
        "float16_arithmetic": cpu_has_float16_arithmetic(),   # a ggml node's KV room: footprint.kv_value_bytes
    }


def machine_status() -> dict:
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(),
        "memory_total": memory.total,
        "memory_available": memory.available,
        "temperature": soc_temperature(),
        "throttled": throttled(),
    }
