"""`mu0 serve` and `mu0 keys` (the implementation lives in runtime/serve.py)."""

from runtime.serve import add_keys_parser
from runtime.serve import add_parser as _add_serve_parser


def add_parser(sub) -> None:
    _add_serve_parser(sub)
    add_keys_parser(sub)
