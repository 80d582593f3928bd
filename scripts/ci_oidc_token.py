"""Print this GitHub Actions job's OIDC token for the audience secure-ml (the pipeline's CI identity).

    SECURE_ML_OIDC_TOKEN="$(python scripts/ci_oidc_token.py)"

Needs ``permissions: id-token: write`` (GitHub then sets ACTIONS_ID_TOKEN_REQUEST_URL and
ACTIONS_ID_TOKEN_REQUEST_TOKEN). secure-ml verifies the token against GitHub's published keys and
maps its issuer and subject to a name through the signed trust policy. Nothing but the token is
printed; errors are one line on stderr, exit 1.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request

AUDIENCE = "secure-ml"


def main() -> int:
    url, bearer = os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL"), os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    if not url or not bearer:
        print("ci_oidc_token: no OIDC token request in this job (it needs `permissions: id-token: write`)",
              file=sys.stderr)
        return 1
    if not url.startswith("https://"):
        print("ci_oidc_token: the token request URL is not https", file=sys.stderr)
        return 1
    request = urllib.request.Request(f"{url}&audience={urllib.parse.quote(AUDIENCE)}",
                                     headers={"Authorization": f"bearer {bearer}"})
    try:
        # The scheme is checked above: GitHub's https token endpoint.
        with urllib.request.urlopen(request, timeout=30) as response:  # nosec B310
            token = json.loads(response.read(1 << 16))["value"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"ci_oidc_token: the token request failed ({type(exc).__name__})", file=sys.stderr)
        return 1
    print(token)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
