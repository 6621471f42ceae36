# A plugin in the original's style: a start-up function whose values every call gets, a
# preprocessing function fanning out to devices, and jobs that fail in every way a job can.
import datetime
import logging
import os
import time

from veritas.plugin import jobschleuder

logger = logging.getLogger("backup")


@jobschleuder("config_backup:on_startup")
def init():
    return {"profile": "netops", "key": os.environ.get("ENCRYPTIONKEY")}


@jobschleuder("config_backup")
def config_backup(*args, **kwargs):
    print(f"backing up {kwargs['device']}")
    logger.warning("using profile %s", kwargs["profile"])
    return {
        "device": kwargs["device"],
        "profile": kwargs["profile"],
        "key": kwargs["key"],
        # Not a JSON value: it arrives as its str(), marked.
        "when": datetime.datetime(2026, 1, 1, 3, 0),
    }


@jobschleuder("get_devices")
def get_devices(*args, **kwargs):
    return [{"cmd": "config_backup", "args": {"device": d}} for d in ("sw1", "sw2", "sw3")]


@jobschleuder("broken")
def broken(**kwargs):
    raise ValueError("the device said no")


@jobschleuder("hang")
def hang(**kwargs):
    time.sleep(600)


@jobschleuder("crash")
def crash(**kwargs):
    os._exit(3)


@jobschleuder("inventory")
def inventory(sot, **kwargs):
    return sot.select("name").using("nb.devices").where(kwargs.get("where", ""))


@jobschleuder("summarize")
def summarize(outcome, **kwargs):
    return {"device": kwargs.get("device"), "saw": outcome["result"]["device"]}
