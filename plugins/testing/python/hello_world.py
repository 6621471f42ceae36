# The original's hello world plugin, as its users have it.
import logging

from veritas.plugin import jobschleuder


@jobschleuder("hello_world")
def hello_world(*args, **kwargs):
    logging.info(f"hello world {args} {kwargs}")
