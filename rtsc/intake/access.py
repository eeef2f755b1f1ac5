"""Who may associate with the receiver: allow-lists checked at association time.

An A-ASSOCIATE-RQ from a peer address, with a calling AE title or a called AE title
that is not allowed is answered with an A-ASSOCIATE-RJ (before any dataset is
accepted). An empty list allows any value.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Sequence

from rtsc.config.fields import parse_networks

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, reason) per PS3.8 table 9-21
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
REJECT_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service user, called AE not recognised
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given


@dataclass(frozen=True)
class AccessPolicy:
    """The receiver's allow-lists.

    Parameters
    ----------
    called_aets, calling_aets : tuple of str
        Allowed called (rtsc's) and calling (peer's) AE titles; empty: any.
    networks : tuple of ip networks
        Allowed peer addresses; empty: any.
    """

    called_aets: tuple[str, ...] = ()
    calling_aets: tuple[str, ...] = ()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_lists(cls, called: Sequence[str], calling: Sequence[str],
                   hosts: Sequence[str]) -> "AccessPolicy":
        """Validate and build from config lists (AE titles compared without padding)."""
        return cls(tuple(a.strip() for a in called), tuple(a.strip() for a in calling),
                   parse_networks(hosts))

    def address_allowed(self, address: str) -> bool:
        """Whether a peer IP address (str) is allowed."""
        if not self.networks:
            return True
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    def check(self, address: str, calling_aet: str, called_aet: str
              ) -> tuple[tuple[int, int, int], str] | None:
        """None if the association may proceed, else (reject result/source/reason, why).

        The reason text names which rule failed but not the AE titles themselves
        beyond what the peer sent (AE titles are not patient data).
        """
        if not self.address_allowed(address):
            return REJECT_NO_REASON, f"peer address {address} is not in receiver.allowed_hosts"
        if self.calling_aets and calling_aet.strip() not in self.calling_aets:
            return REJECT_CALLING_AET, (f"calling AE title {calling_aet.strip()!r} is not in "
                                        f"receiver.calling_aets")
        if self.called_aets and called_aet.strip() not in self.called_aets:
            return REJECT_CALLED_AET, (f"called AE title {called_aet.strip()!r} is not in "
                                       f"receiver.called_aets")
        return None
