"""Field-level building blocks of the configuration schema.

:func:`_spec` declares a dataclass field together with what the loader checks (range,
choices, list length) and the description the configuration reference prints.
:func:`parse_networks` checks the receiver's address allow-list; it lives here, not in
the intake, so that loading a configuration imports nothing but the schema (the
receiver's access policy imports it from here).
"""

from __future__ import annotations

import ipaddress
from dataclasses import field
from typing import Any, Sequence

from rtsc.errors import ConfigError


def _spec(default: Any, *, lo: float | None = None, hi: float | None = None,
          choices: tuple[Any, ...] | None = None, length: int | None = None,
          doc: str = "") -> Any:
    """A dataclass field with validation metadata (inclusive range, choices, list length).

    Parameters
    ----------
    default : the default value (a list or dict is copied for every instance)
    lo, hi : inclusive bounds of a number, or of every number in a list
    choices : the allowed values
    length : the required length of a list
    doc : the description printed in the configuration reference (docs/configuration.md)
    """
    meta = {"lo": lo, "hi": hi, "choices": choices, "length": length, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_networks(entries: Sequence[str], key: str = "receiver.allowed_hosts"
                   ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or CIDR networks ("10.0.0.5", "10.0.0.0/24", "::1") as networks.

    Raises
    ------
    ConfigError
        An entry that is neither (naming the key and the value).
    """
    networks = []
    for i, entry in enumerate(entries):
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"{key}[{i}]: {entry!r} is not an IP address or network "
                              f"(e.g. 192.168.1.20 or 192.168.1.0/24)") from exc
    return tuple(networks)
