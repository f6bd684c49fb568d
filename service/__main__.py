"""`python -m service [--host H] [--port P]`: run the API server; everything else comes from PREFIXSERVE_*."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from .app import create_app
from .runtime import UnsupportedBackbone, check_backbone
from .server import configure_logging, run
from .settings import ServiceSettings
from .tracing import setup as setup_tracing

log = logging.getLogger("service")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    settings = ServiceSettings()
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument("--host", default=settings.host)
    parser.add_argument("--port", type=int, default=settings.port)
    args = parser.parse_args(argv)
    configure_logging(settings.log_level, settings.log_format)
    settings.apply_torch_threads()
    if not settings.auth_enabled:
        if not is_loopback(args.host):
            log.error(
                "refusing to bind %s without keys: set PREFIXSERVE_API_KEYS / PREFIXSERVE_ADMIN_KEYS, or bind "
                "a loopback address",
                args.host,
            )
            return 2
        log.warning("no API keys configured: the service is open to anyone who can reach %s", args.host)
    try:  # before anything starts: an unsupported backbone family is refused with its reason, not a traceback
        check_backbone(**settings.backbone_args())
    except UnsupportedBackbone as e:
        log.error("%s", e)
        return 2
    except Exception as e:  # no config to read (offline, not found): the loader reports it in full
        log.debug("backbone pre-check skipped: %s", e)
    setup_tracing(settings)
    return run(create_app(settings), settings, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
