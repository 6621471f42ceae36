# The worker's side of a Python plugin: runs one plugin module of the original jobschleuder in
# this interpreter and answers calls, one JSON line per request and per answer.
#
# argv: the plugin's .py file. Protocol on the original stdout (fd 1, kept for answers only):
#   first line   {"ready": [names]}  or  {"fatal": "why"}
#   per request  {"name", "kind", "kwargs", "sot", "outcome"}
#   while a function's on_startup runs (first call only): {"starting": name}, then {"started": name}
#   per answer   {"ok": value, "converted": [paths]}  or  {"error": {"type", "message", "traceback"}}
#                or {"missing": [names]} when no function has that name; an answer after an
#                on_startup also carries {"startup": values} (the worker masks its secrets)
# Everything the plugin prints goes to stderr; logging records go there as "\x1fLEVEL\x1fmessage".
import importlib.util
import json
import logging
import os
import sys
import traceback
import types

PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
REQUESTS = os.fdopen(os.dup(0), "r", encoding="utf-8")
# The plugin and whatever it starts see stderr as stdout and nothing as stdin: neither can
# write into the answers or read the next request.
os.dup2(2, 1)
_null = os.open(os.devnull, os.O_RDONLY)
os.dup2(_null, 0)
os.close(_null)
sys.stdout = sys.stderr

REGISTRY = {}


def jobschleuder(name):
    """The original's decorator: registers a function under `name` (or `name:on_startup`)."""

    def register(func):
        REGISTRY[name] = func
        return func

    return register


# `from veritas.plugin import jobschleuder` keeps working: the real package's decorator is
# replaced by ours when it is installed, and provided when it is not.
try:
    import veritas.plugin as _veritas_plugin

    _veritas_plugin.jobschleuder = jobschleuder
except ImportError:
    _veritas = sys.modules.get("veritas") or types.ModuleType("veritas")
    _plugin = types.ModuleType("veritas.plugin")
    _plugin.jobschleuder = jobschleuder
    _veritas.plugin = _plugin
    sys.modules["veritas"] = _veritas
    sys.modules["veritas.plugin"] = _plugin


class _Records(logging.Handler):
    def emit(self, record):
        try:
            message = self.format(record).replace("\n", " | ")
            sys.stderr.write("\x1f%s\x1f%s\n" % (record.levelname, message))
            sys.stderr.flush()
        except Exception:
            pass


_handler = _Records()
_handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
logging.basicConfig(level=logging.DEBUG, handlers=[_handler], force=True)
try:
    from loguru import logger as _loguru

    _loguru.remove()
    _loguru.add(
        lambda m: (
            sys.stderr.write(
                "\x1f%s\x1f%s\n" % (m.record["level"].name, str(m.record["message"]).replace("\n", " | "))
            ),
            sys.stderr.flush(),
        ),
        level="DEBUG",
    )
except ImportError:
    pass


def answer(value):
    PROTOCOL.write(json.dumps(value) + "\n")
    PROTOCOL.flush()


def plain(value, path, converted):
    """`value` as JSON can hold it; anything else becomes its str() and is marked."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v, path + [str(k)], converted) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v, path + [str(i)], converted) for i, v in enumerate(value)]
    converted.append(".".join(path) or "(the value)")
    try:
        text = str(value)
    except Exception as error:
        text = "<str() failed: %s>" % type(error).__name__
    return {"__str__": text, "__type__": type(value).__name__}


def source_of_truth(section):
    """What the original handed over for `sot: true`: a veritas Sot object."""
    if not section:
        raise RuntimeError("the job asks for `sot: true`, but the config has no `sot:` section")
    try:
        from veritas.sot import sot as sot_module
    except ImportError:
        raise RuntimeError(
            "the job asks for `sot: true`, which needs the `veritas` library in the plugin's "
            "Python (pip install it there, or point the plugin's `python:` at an interpreter that has it)"
        )
    return sot_module.Sot(
        token=section.get("token"),
        url=section.get("nautobot") or section.get("url"),
        ssl_verify=section.get("ssl_verify", True),
    )


STARTED = {}


def failure(error, **extra):
    frames = traceback.format_exception(type(error), error, error.__traceback__)
    return dict(
        {"error": {"type": type(error).__name__, "message": str(error), "traceback": "".join(frames[-6:])}},
        **extra
    )


def call(request):
    name = request["name"]
    func = REGISTRY.get(name)
    if func is None:
        return {"missing": sorted(n for n in REGISTRY if not n.endswith(":on_startup"))}
    kwargs = dict(request.get("kwargs") or {})
    extra = {}
    startup = REGISTRY.get(name + ":on_startup")
    if startup is not None and name not in STARTED:
        answer({"starting": name})
        try:
            values = startup()
        except Exception as error:
            return failure(error, startup=None)
        finally:
            answer({"started": name})
        if not isinstance(values, dict):
            return {
                "error": {
                    "type": "TypeError",
                    "message": "%s:on_startup must return a dict, not %s" % (name, type(values).__name__),
                    "traceback": "",
                },
                "startup": None,
            }
        STARTED[name] = values
        extra["startup"] = plain(values, [], [])
    kwargs.update(STARTED.get(name, {}))
    try:
        if kwargs.get("sot") is True:
            kwargs["sot"] = source_of_truth(request.get("sot"))
        if request.get("kind") == "postprocessing":
            if "outcome" in kwargs:
                raise TypeError(
                    "the job's arguments have a key `outcome`, which postprocessing functions "
                    "get as the job's outcome: rename that argument"
                )
            kwargs["outcome"] = request.get("outcome")
        result = func(**kwargs)
        converted = []
        value = plain(result, [], converted)
        json.dumps(value, allow_nan=False)
    except Exception as error:
        return failure(error, **extra)
    return dict({"ok": value, "converted": converted}, **extra)


def main():
    path = sys.argv[1]
    folder = os.path.dirname(os.path.abspath(path))
    # Siblings import each other, and `from plugins.x import y` works from the folder above.
    for entry in (folder, os.path.dirname(folder)):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    module_name = os.path.splitext(os.path.basename(path))[0]
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except BaseException as error:
        answer({"fatal": "importing %s failed: %s: %s" % (path, type(error).__name__, error)})
        return
    answer({"ready": sorted(REGISTRY)})
    for line in REQUESTS:
        if line.strip():
            answer(call(json.loads(line)))


main()
