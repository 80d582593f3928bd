"""Write a configuration directory for CI: the shipped one, with Sigstore keyless model signing.

    python scripts/ci_keyless_config.py OUT_DIR SIGNER_IDENTITY

SIGNER_IDENTITY is the workflow's certificate identity (https://github.com/OWNER/REPO/.github/
workflows/pipeline.yml@REF); only signatures by that workflow, from GitHub's OIDC issuer, verify.
The gates' data (release.yaml, roles.yaml) is copied unchanged: the signed trust policy decides it.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"


def main(out: str, identity: str) -> int:
    if not identity.startswith("https://github.com/"):
        print(f"ci_keyless_config: the signer identity must be a GitHub workflow URL, not {identity!r}",
              file=sys.stderr)
        return 2
    source = Path(__file__).resolve().parents[1] / "secure_ml" / "config"
    target = Path(out)
    shutil.copytree(source, target, dirs_exist_ok=True)
    security = yaml.safe_load((target / "security.yaml").read_text())
    security["signing"]["method"] = "sigstore"
    security["signing"]["trusted_identities"] = [{"identity": identity, "issuer": GITHUB_ISSUER}]
    (target / "security.yaml").write_text(yaml.safe_dump(security, sort_keys=False))
    print(f"keyless signing configured in {target}: trusted signer {identity}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
