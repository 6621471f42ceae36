# Plugins that do what real plugins sometimes do by accident.
import os
import sys

from veritas.plugin import jobschleuder


@jobschleuder("secretive:on_startup")
def secretive_startup():
    return {"token": "startup-token-5150"}


@jobschleuder("secretive")
def secretive(**kwargs):
    # Hands back what on_startup gave it: a credential.
    return {"token_was": kwargs["token"], "said": "the token is " + kwargs["token"]}


@jobschleuder("unready:on_startup")
def unready_startup():
    raise ConnectionError("the source of truth is unreachable")


@jobschleuder("unready")
def unready(**kwargs):
    return "never"


@jobschleuder("not_a_number")
def not_a_number(**kwargs):
    return {"ratio": float("nan")}


@jobschleuder("mixed_output")
def mixed_output(**kwargs):
    # Bytes that are not UTF-8 on both output streams, then ordinary output.
    os.write(1, b"caf\xe9 on stdout\n")
    os.write(2, b"caf\xe9 on stderr\n")
    print("still logging after that")
    return "ok"


@jobschleuder("reads_stdin")
def reads_stdin(**kwargs):
    # A plugin (or a program it runs) reading stdin gets nothing, and cannot take requests.
    return {"stdin": sys.stdin.read()}
