"""Container health check: exit 0 when the service answers 200 on /ready (model loaded), 1 otherwise.

Docker runs it as the image's HEALTHCHECK, so it uses the standard library only and reads the same
ZASR_PORT the service listens on. /ready (not /health) is the right probe: a replica whose model is still
loading answers 503 there, so `docker compose up --wait`, depends_on conditions and proxies hold traffic.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('ZASR_PORT', '8000')}/ready"
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("ZASR_HEALTHCHECK_TIMEOUT_S", "4"))) as reply:
            return 0 if reply.status == 200 else 1
    except (urllib.error.URLError, OSError) as error:  # 503 while loading arrives as HTTPError (a URLError)
        print(f"not ready: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
