"""`leasectl cleanup`: remove everything the agent owns on this host, for uninstalling.

What the agent leaves in place when it stops (on purpose: traffic keeps
flowing across a restart) is removed here, and nothing else:

- every route carrying its route protocol (`--route-protocol`, 76);
- every backend profile's devices (`BackendProfile.owns_link`, leaseagent.core.profiles;
  `dataplane.kept.ours`, the rule the agent's start and doctor use), kept ones too:
  vxlan's (`flannel.<VNI>`, `flannel-v6.<VNI>`, and `flaside.<VNI>`,
  `flaside6.<VNI>` a Port change put aside, `flback.<VNI>`, `flback6.<VNI>` one
  taking its name back; kind vxlan), which takes their
  neighbour and FDB entries with them; WireGuard's (`flannel-wg`, `flannel-wg-v6`,
  kind wireguard, or kind tun when wireguard-go serves them: wireguard-go ends when
  its device is gone);
- its traffic rules of both families: the nftables tables `ip leaseagent` and
  `ip6 leaseagent`, the iptables and ip6tables chains LEASEAGENT-* with their
  jumps, the ipsets of VXLAN peers (whichever exist; a host without IPv6 or
  without one of the tools has none of that kind);
- the nftables table `inet leaseagent-ports`, a WireGuard ListenPort change's
  redirect of the old port (leaseagent.dataplane.portmove), if an agent
  stopped within --peer-hold-time of one.

Stop the agent first (`systemctl disable --now leaseagent`), or it puts them
back. Needs no etcd. The lease in etcd is not touched: `leasectl release`.
"""

from __future__ import annotations

from leaseagent.cli.doctor import DoctorSettings
from leaseagent.core.plan import Route
from leaseagent.core.rules import FAMILIES, ObservedRules
from leaseagent.dataplane import kept, portmove
from leaseagent.dataplane.firewall import Firewall, IptablesFirewall, NftFirewall
from leaseagent.dataplane.netlink import Action, Netlink
from leaseagent.errors import ConfigError, DataPlaneError


async def cleanup(settings: DoctorSettings) -> list[str]:
    """Remove what the agent owns here; one line per thing removed."""
    done: list[str] = []
    nl = await Netlink.open()
    try:
        routes = sorted(await nl.routes(protocol=settings.route_protocol), key=lambda r: str(r.dst))
        removed, failed = await nl.apply(Action.REMOVE, routes, protocol=settings.route_protocol)
        done += [f"removed route {r.dst}" for r in removed if isinstance(r, Route)]
        done += [f"could not remove route {f.obj}: {f.error}" for f in failed]
        for link in kept.ours(await nl.links()):  # kept ones too, the agent being stopped
            await nl.delete_link(link.index)
            done.append(f"removed device {link.name}")
    finally:
        nl.close()
    firewalls: list[Firewall] = [kind(family=family) for family in FAMILIES
                                 for kind in (NftFirewall, IptablesFirewall)]
    for fw in firewalls:
        what = f"{fw.family.shown}{fw.name}"  # "nftables", ..., "IPv6 iptables"
        try:
            observed = await fw.observe()
        except DataPlaneError:
            continue  # that tool is not installed: nothing of ours can be there
        if observed != ObservedRules():
            try:
                await fw.remove()
            except (ConfigError, DataPlaneError) as exc:
                done.append(f"could not remove the {what} rules: {exc}")
                continue
            done.append(f"removed the {what} rules ({', '.join(sorted(observed.chains))})")
    if await portmove.remove():
        done.append(f"removed the nftables table {portmove.TABLE} (a WireGuard port change's "
                    "redirect)")
    return done
