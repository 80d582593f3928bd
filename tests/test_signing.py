"""Model signatures: local-key signing, verification against trust, interoperability, bad input.

Touches: real model-signing 1.1.1 (library and its upstream ``model_signing`` CLI), real ECDSA keys
made here, real torch/safetensors model directories made here, sigstore-python's verifier with the
trusted root it ships (offline), and the ``secure-ml verify-model`` command.
Does not touch: Sigstore keyless *signing* (it needs an OIDC identity and the network; only the
configuration path and its clear refusal are tested). The Sigstore bundle below is a real keyless
bundle from sigstore/model-transparency's test data (scripts/tests/v1.1.0-sigstore/model.sig, signed
by stefanb@us.ibm.com via https://sigstore.verify.ibm.com/oauth2 over two files "signme-1" and
"signme-2"); it verifies offline here.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from secure_ml.cli import main as cli
from secure_ml.custody.integrity import sha256_tree
from secure_ml.errors import BadInput, ConfigurationError, VerificationError
from secure_ml.security import signing
from secure_ml.settings import Settings

pytestmark = pytest.mark.slow  # signs with model-signing and runs the upstream CLI

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_CLI = Path(sys.executable).parent / "model_signing"
SIGSTORE_IDENTITY = ("stefanb@us.ibm.com", "https://sigstore.verify.ibm.com/oauth2")
SIGSTORE_BUNDLE = r'''{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"certificate":{"rawBytes":"MIIC4TCCAmegAwIBAgIUa3WSeVG/boyCDQDJ07gYTLsJubMwCgYIKoZIzj0EAwMwNzEVMBMGA1UEChMMc2lnc3RvcmUuZGV2MR4wHAYDVQQDExVzaWdzdG9yZS1pbnRlcm1lZGlhdGUwHhcNMjUxMDEwMDIxMjE5WhcNMjUxMDEwMDIyMjE5WjAAMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEY32c1Qu5APmRfKordQ/HXajD0mwIRvF1YU/EQGQ0dlraWVlHZW5AJvd1EdaQS0iD+oobZBSaJO7gQCbqnVvpFaOCAYYwggGCMA4GA1UdDwEB/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcDAzAdBgNVHQ4EFgQUMCW6cDwPXLbzZeQCkm1whKrJ1mcwHwYDVR0jBBgwFoAU39Ppz1YkEZb5qNjpKFWixi4YZD8wIAYDVR0RAQH/BBYwFIESc3RlZmFuYkB1cy5pYm0uY29tMDQGCisGAQQBg78wAQEEJmh0dHBzOi8vc2lnc3RvcmUudmVyaWZ5LmlibS5jb20vb2F1dGgyMDYGCisGAQQBg78wAQgEKAwmaHR0cHM6Ly9zaWdzdG9yZS52ZXJpZnkuaWJtLmNvbS9vYXV0aDIwgYoGCisGAQQB1nkCBAIEfAR6AHgAdgDdPTBqxscRMmMZHhyZZzcCokpeuN48rf+HinKALynujgAAAZnL4/t2AAAEAwBHMEUCIHuf5vjVO9O6DfAvxewYewJQVcLLme0vu2cI0XGAf0MHAiEApyukrrG6bbKyzqy94ozAnEFu9pMALPWANU70UCDFa1swCgYIKoZIzj0EAwMDaAAwZQIwPUmtl3FxAm9GyJlJNCkA87s99i8XXwmG/Padvf4Lxa+uUrNp3k7xiNK5iPx2PYLkAjEAzDTatbjGuUu8Nt+QuKV5ETTm64Dp9tknxRpww3crohaESGeLI9FGJjRdt/rJTg5s"},"tlogEntries":[{"logIndex":"598151086","logId":{"keyId":"wNI9atQGlz+VWfO6LRygH4QUfY/8W4RFwiT5i5WRgB0="},"kindVersion":{"kind":"dsse","version":"0.0.1"},"integratedTime":"1760062340","inclusionPromise":{"signedEntryTimestamp":"MEQCIErVIgUO5ZfOBVXVM8URhnDQ2RXg7H+960ckEz8xKkdoAiBkki5CpODdpZw8GzMNv/nnT1j5OQ6l/Y5k00n7P0AXFQ=="},"inclusionProof":{"logIndex":"476246824","rootHash":"V0NA1ekHc4sMtyOk9+rSfb50+v1kFb/0QXYbxrm43gk=","treeSize":"476246825","hashes":["P439a1wjUaISQbG2jSIGT1cYyPX/NrcxVNhfdV7vC58=","Zmf17o5a5Q69nPPFcZTIHWt03F7krvYqLjX5ylwcyjw=","LDCpNmslA1L7YsmcpNgJE8pI0RLvKzkjgTnWmC3RoQU=","RMIhrLfp2BLk66iRNh4DO0I1QdT+xVXblaEquoF2eMA=","XuOiSVrtXSjInBDyY16xTAtnybLJbbMt0GHqY+lxnQw=","imx5Ivjtx0tL3eX7cFdug6dCZT5V9YhYr+rYIeHF3lw=","7fl3pUuZjc8qWxs6SWIHFxnL7Aose8cHfiRve+vnPH0=","HUKR+riB5/kHb8gDoz22EojKqYzZkNUppu1iZbRbgho=","rGf6uU5Fk1rxS3ouDvqesdgb3mi2vKynuX2AUMf886A=","mxhgKnbFidkcY9Sspg3POkzMS3zMgeWy033i8AHVyWQ=","EGaD/cNavzxGYLx1Gl0uNNWBZvyXlSHSdlIeH7m+63A=","2Wv4GiithwNukRKV06clevnQQYCzXmSS/+/OJtXgsXQ=","1mfy94KpcItqshH9+gwqV6jccupcaMpVsF28New8zDY=","vS7O4ozHIQZJWBiov+mkpI27GE8zAmVCEkRcP3NDyNE="],"checkpoint":{"envelope":"rekor.sigstore.dev - 1193050959916656506\n476246825\nV0NA1ekHc4sMtyOk9+rSfb50+v1kFb/0QXYbxrm43gk=\n\n— rekor.sigstore.dev wNI9ajBFAiBtV0gov0pC7kBG6WPaApxiUudh/9C4XyIybO93bBSVwQIhAIbRCl/2O4fJ83ik6SiLnFx3ipedmkvKoQ9ykKvQYdS4\n"}},"canonicalizedBody":"eyJhcGlWZXJzaW9uIjoiMC4wLjEiLCJraW5kIjoiZHNzZSIsInNwZWMiOnsiZW52ZWxvcGVIYXNoIjp7ImFsZ29yaXRobSI6InNoYTI1NiIsInZhbHVlIjoiM2FmMTk5MGQ0OTQ5OWNmMWU3NzJiNWMwMmNmNWNjMWU1OWFmMjM2Mzc0NzlhZDExOTdjMTI0NDg0NmI1Yjg2NiJ9LCJwYXlsb2FkSGFzaCI6eyJhbGdvcml0aG0iOiJzaGEyNTYiLCJ2YWx1ZSI6IjFkYzYyMjM5ZTZlMjc3NmE4Nzc2ZWVkN2FkNDIzMTIzZjQ2ZWFhYjMzZGMxNTk2N2Q3Yjk5OTE2OGM2ZDExZWQifSwic2lnbmF0dXJlcyI6W3sic2lnbmF0dXJlIjoiTUVVQ0lCak9BOFZXSWJZK1lNZHVrR1UxUDBNSG9DVmpiaWJZS1J2S3ArZGRBcjRGQWlFQXRSaTAwNDluaGZOVFg2cjRzeHBQSlltbm1jTWVJMXlsWUQvYWs4cUsxeWc9IiwidmVyaWZpZXIiOiJMUzB0TFMxQ1JVZEpUaUJEUlZKVVNVWkpRMEZVUlMwdExTMHRDazFKU1VNMFZFTkRRVzFsWjBGM1NVSkJaMGxWWVROWFUyVldSeTlpYjNsRFJGRkVTakEzWjFsVVRITktkV0pOZDBObldVbExiMXBKZW1vd1JVRjNUWGNLVG5wRlZrMUNUVWRCTVZWRlEyaE5UV015Ykc1ak0xSjJZMjFWZFZwSFZqSk5ValIzU0VGWlJGWlJVVVJGZUZaNllWZGtlbVJIT1hsYVV6RndZbTVTYkFwamJURnNXa2RzYUdSSFZYZElhR05PVFdwVmVFMUVSWGROUkVsNFRXcEZOVmRvWTA1TmFsVjRUVVJGZDAxRVNYbE5ha1UxVjJwQlFVMUdhM2RGZDFsSUNrdHZXa2w2YWpCRFFWRlpTVXR2V2tsNmFqQkVRVkZqUkZGblFVVlpNekpqTVZGMU5VRlFiVkptUzI5eVpGRXZTRmhoYWtRd2JYZEpVblpHTVZsVkwwVUtVVWRSTUdSc2NtRlhWbXhJV2xjMVFVcDJaREZGWkdGUlV6QnBSQ3R2YjJKYVFsTmhTazgzWjFGRFluRnVWblp3Um1GUFEwRlpXWGRuWjBkRFRVRTBSd3BCTVZWa1JIZEZRaTkzVVVWQmQwbElaMFJCVkVKblRsWklVMVZGUkVSQlMwSm5aM0pDWjBWR1FsRmpSRUY2UVdSQ1owNVdTRkUwUlVablVWVk5RMWMyQ21ORWQxQllUR0o2V21WUlEydHRNWGRvUzNKS01XMWpkMGgzV1VSV1VqQnFRa0puZDBadlFWVXpPVkJ3ZWpGWmEwVmFZalZ4VG1wd1MwWlhhWGhwTkZrS1drUTRkMGxCV1VSV1VqQlNRVkZJTDBKQ1dYZEdTVVZUWXpOU2JGcHRSblZaYTBJeFkzazFjRmx0TUhWWk1qbDBUVVJSUjBOcGMwZEJVVkZDWnpjNGR3cEJVVVZGU20xb01HUklRbnBQYVRoMll6SnNibU16VW5aamJWVjFaRzFXZVdGWFdqVk1iV3hwWWxNMWFtSXlNSFppTWtZeFpFZG5lVTFFV1VkRGFYTkhDa0ZSVVVKbk56aDNRVkZuUlV0QmQyMWhTRkl3WTBoTk5reDVPWHBoVjJSNlpFYzVlVnBUTlRKYVdFcHdXbTVyZFdGWFNuUk1iVTUyWWxNNWRsbFlWakFLWVVSSmQyZFpiMGREYVhOSFFWRlJRakZ1YTBOQ1FVbEZaa0ZTTmtGSVowRmtaMFJrVUZSQ2NYaHpZMUpOYlUxYVNHaDVXbHA2WTBOdmEzQmxkVTQwT0FweVppdElhVzVMUVV4NWJuVnFaMEZCUVZwdVREUXZkREpCUVVGRlFYZENTRTFGVlVOSlNIVm1OWFpxVms4NVR6WkVaa0YyZUdWM1dXVjNTbEZXWTB4TUNtMWxNSFoxTW1OSk1GaEhRV1l3VFVoQmFVVkJjSGwxYTNKeVJ6WmlZa3Q1ZW5GNU9UUnZla0Z1UlVaMU9YQk5RVXhRVjBGT1ZUY3dWVU5FUm1FeGMzY0tRMmRaU1V0dldrbDZhakJGUVhkTlJHRkJRWGRhVVVsM1VGVnRkR3d6Um5oQmJUbEhlVXBzU2s1RGEwRTROM001T1drNFdGaDNiVWN2VUdGa2RtWTBUQXA0WVN0MVZYSk9jRE5yTjNocFRrczFhVkI0TWxCWlRHdEJha1ZCZWtSVVlYUmlha2QxVlhVNFRuUXJVWFZMVmpWRlZGUnROalJFY0RsMGEyNTRVbkIzQ25jelkzSnZhR0ZGVTBkbFRFazVSa2RLYWxKa2RDOXlTbFJuTlhNS0xTMHRMUzFGVGtRZ1EwVlNWRWxHU1VOQlZFVXRMUzB0TFFvPSJ9XX19"}],"timestampVerificationData":{"rfc3161Timestamps":[{"signedTimestamp":"MIIE6jADAgEAMIIE4QYJKoZIhvcNAQcCoIIE0jCCBM4CAQMxDTALBglghkgBZQMEAgEwgcMGCyqGSIb3DQEJEAEEoIGzBIGwMIGtAgEBBgkrBgEEAYO/MAIwMTANBglghkgBZQMEAgEFAAQga5YfS9uNUrAWaCZmFrnMjsPuChgSgfDRpFdOtmM+ac4CFQD/YLoVuYw+NCUay/d75F3V5kFWixgPMjAyNTEwMTAwMjEyMjBaMAMCAQECCQDFN7Jnd4cho6AypDAwLjEVMBMGA1UEChMMc2lnc3RvcmUuZGV2MRUwEwYDVQQDEwxzaWdzdG9yZS10c2GgggIUMIICEDCCAZagAwIBAgIUOhNULwyQYe68wUMvy4qOiyojiwwwCgYIKoZIzj0EAwMwOTEVMBMGA1UEChMMc2lnc3RvcmUuZGV2MSAwHgYDVQQDExdzaWdzdG9yZS10c2Etc2VsZnNpZ25lZDAeFw0yNTA0MDgwNjU5NDNaFw0zNTA0MDYwNjU5NDNaMC4xFTATBgNVBAoTDHNpZ3N0b3JlLmRldjEVMBMGA1UEAxMMc2lnc3RvcmUtdHNhMHYwEAYHKoZIzj0CAQYFK4EEACIDYgAE4ra2Z8hKNig2T9kFjCAToGG30jky+WQv3BzL+mKvh1SKNR/UwuwsfNCg4sryoYAd8E6isovVA3M4aoNdm9QDi50Z8nTEyvqgfDPtTIwXItfiW/AFf1V7uwkbkAoj0xxco2owaDAOBgNVHQ8BAf8EBAMCB4AwHQYDVR0OBBYEFIn9eUOHz9BlRsMCRscsc1t9tOsDMB8GA1UdIwQYMBaAFJjsAe9/u1H/1JUeb4qImFMHic6/MBYGA1UdJQEB/wQMMAoGCCsGAQUFBwMIMAoGCCqGSM49BAMDA2gAMGUCMDtpsV/6KaO0qyF/UMsX2aSUXKQFdoGTptQGc0ftq1csulHPGG6dsmyMNd3JB+G3EQIxAOajvBcjpJmKb4Nv+2Taoj8Uc5+b6ih6FXCCKraSqupe07zqswMcXJTe1cExvHvvlzGCAdowggHWAgEBMFEwOTEVMBMGA1UEChMMc2lnc3RvcmUuZGV2MSAwHgYDVQQDExdzaWdzdG9yZS10c2Etc2VsZnNpZ25lZAIUOhNULwyQYe68wUMvy4qOiyojiwwwCwYJYIZIAWUDBAIBoIH8MBoGCSqGSIb3DQEJAzENBgsqhkiG9w0BCRABBDAcBgkqhkiG9w0BCQUxDxcNMjUxMDEwMDIxMjIwWjAvBgkqhkiG9w0BCQQxIgQgv1Csv8lsWQc5xuuZyGTRUpqYwoNDXHP5miHeRWHb6PMwgY4GCyqGSIb3DQEJEAIvMX8wfTB7MHkEIIX5J7wHq2LKw7RDVsEO/IGyxog/2nq55thw2dE6zQW3MFUwPaQ7MDkxFTATBgNVBAoTDHNpZ3N0b3JlLmRldjEgMB4GA1UEAxMXc2lnc3RvcmUtdHNhLXNlbGZzaWduZWQCFDoTVC8MkGHuvMFDL8uKjosqI4sMMAoGCCqGSM49BAMCBGYwZAIwDimRagDUYAiMYNtUqwZ7rJyj1WjjivMV8kwWVZ+Sz+PMPsj8pmvvSSiMcBzOSrNvAjBWhngjKfqhBqFDZprdWlUSgdXokkT6rMyoSe5gvw8QkLhgR3eo+/5930xAA+UmiBQ="}]}},"dsseEnvelope":{"payload":"ewogICJfdHlwZSI6ICJodHRwczovL2luLXRvdG8uaW8vU3RhdGVtZW50L3YxIiwKICAic3ViamVjdCI6IFsKICAgIHsKICAgICAgIm5hbWUiOiAidjEuMS4wLXNpZ3N0b3JlIiwKICAgICAgImRpZ2VzdCI6IHsKICAgICAgICAic2hhMjU2IjogIjYxZDQ4NDlkOWQ5MDA3NmQ2MjE1ZjRkNTI1ZjEzZDY1NzRhZjhlM2Y2N2FlZjNlNmYzNmZjNDBhMTRmZGQyMjYiCiAgICAgIH0KICAgIH0KICBdLAogICJwcmVkaWNhdGVUeXBlIjogImh0dHBzOi8vbW9kZWxfc2lnbmluZy9zaWduYXR1cmUvdjEuMCIsCiAgInByZWRpY2F0ZSI6IHsKICAgICJyZXNvdXJjZXMiOiBbCiAgICAgIHsKICAgICAgICAiZGlnZXN0IjogImY2MzEwMDY2YzczMjA0OTdlYTU1NDI2MGMzMmM0MzY2MGJmZjY0OGNiMmE2MTE5NDgzMmNjMDg2MDc3MDg1ZTEiLAogICAgICAgICJuYW1lIjogInNpZ25tZS0xIiwKICAgICAgICAiYWxnb3JpdGhtIjogInNoYTI1NiIKICAgICAgfSwKICAgICAgewogICAgICAgICJkaWdlc3QiOiAiMzJkY2IxZjhlMWFlNTJkNTk2M2U1NmE2YmEwNmFiNThiNDI0YzE1ZWQyYTZiNzBkMmZlY2ExZDA4OTM3MDAyOCIsCiAgICAgICAgIm5hbWUiOiAic2lnbm1lLTIiLAogICAgICAgICJhbGdvcml0aG0iOiAic2hhMjU2IgogICAgICB9CiAgICBdLAogICAgInNlcmlhbGl6YXRpb24iOiB7CiAgICAgICJhbGxvd19zeW1saW5rcyI6IGZhbHNlLAogICAgICAibWV0aG9kIjogImZpbGVzIiwKICAgICAgImhhc2hfdHlwZSI6ICJzaGEyNTYiLAogICAgICAiaWdub3JlX3BhdGhzIjogWwogICAgICAgICIuZ2l0aWdub3JlIiwKICAgICAgICAiLmdpdGF0dHJpYnV0ZXMiLAogICAgICAgICIuZ2l0IiwKICAgICAgICAiLmdpdGh1YiIsCiAgICAgICAgImlnbm9yZS1tZSIsCiAgICAgICAgIm1vZGVsLnNpZyIKICAgICAgXQogICAgfQogIH0KfQ==","payloadType":"application/vnd.in-toto+json","signatures":[{"sig":"MEUCIBjOA8VWIbY+YMdukGU1P0MHoCVjbibYKRvKp+ddAr4FAiEAtRi0049nhfNTX6r4sxpPJYmnmcMeI1ylYD/ak8qK1yg="}]}}'''


def write_model(directory: Path, *, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    directory.mkdir(parents=True)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"seed": seed}))
    (directory / "MODEL_CARD.md").write_text("# model card\n")
    return directory


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    private = tmp_path / "keys" / "model-signing.pem"
    public = signing.ensure_signing_key(private)
    other_private = tmp_path / "other" / "model-signing.pem"
    other_public = signing.ensure_signing_key(other_private)
    return {"private": private, "public": public, "other_private": other_private, "other_public": other_public}


@pytest.fixture
def signed(tmp_path: Path, keys: dict[str, Path]) -> tuple[Path, Path]:
    model = write_model(tmp_path / "model")
    bundle = tmp_path / "model.sig"
    signing.sign_model(model, bundle, private_key=keys["private"])
    return model, bundle


def trust(keys: dict[str, Path]) -> signing.TrustPolicy:
    return signing.TrustPolicy.of(public_keys=[keys["public"]])


def test_key_is_created_once_owner_only(tmp_path: Path, keys: dict[str, Path]) -> None:
    assert keys["private"].stat().st_mode & 0o777 == 0o600
    before = keys["private"].read_bytes()
    signing.ensure_signing_key(keys["private"])
    assert keys["private"].read_bytes() == before
    keys["private"].chmod(0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        signing.ensure_signing_key(keys["private"])


def test_sign_and_verify(signed: tuple[Path, Path], keys: dict[str, Path]) -> None:
    model, bundle = signed
    verified = signing.verify_model(model, bundle, trust(keys))
    assert set(verified.files) == {"model.safetensors", "config.json", "MODEL_CARD.md"}
    assert verified.method == "key" and "model-signing.pub" in verified.signer
    assert "PRIVATE" not in bundle.read_text()


def test_our_signature_verifies_with_upstream_cli(signed: tuple[Path, Path], keys: dict[str, Path]) -> None:
    model, bundle = signed
    result = subprocess.run([str(UPSTREAM_CLI), "verify", "key", str(model), "--signature", str(bundle),
                             "--public_key", str(keys["public"])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (model / "config.json").write_text("{}")
    result = subprocess.run([str(UPSTREAM_CLI), "verify", "key", str(model), "--signature", str(bundle),
                             "--public_key", str(keys["public"])], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_we_verify_what_upstream_cli_signs(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = write_model(tmp_path / "model")
    bundle = tmp_path / "upstream.sig"
    result = subprocess.run([str(UPSTREAM_CLI), "sign", "key", str(model), "--signature", str(bundle),
                             "--private_key", str(keys["private"])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert signing.verify_model(model, bundle, trust(keys)).files
    (model / "MODEL_CARD.md").write_text("# changed\n")
    with pytest.raises(VerificationError, match="MODEL_CARD.md changed after signing"):
        signing.verify_model(model, bundle, trust(keys))


def test_file_changed_after_signing(signed: tuple[Path, Path], keys: dict[str, Path]) -> None:
    model, bundle = signed
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.safetensors changed after signing"):
        signing.verify_model(model, bundle, trust(keys))


def test_file_added_or_removed(signed: tuple[Path, Path], keys: dict[str, Path]) -> None:
    model, bundle = signed
    (model / "extra.json").write_text("{}")
    with pytest.raises(VerificationError, match="extra.json added after signing"):
        signing.verify_model(model, bundle, trust(keys))
    (model / "extra.json").unlink()
    (model / ".gitattributes").write_text("* binary\n")  # model-signing itself skips .git* paths
    with pytest.raises(VerificationError, match="gitattributes"):
        signing.verify_model(model, bundle, trust(keys))
    (model / ".gitattributes").unlink()
    (model / "MODEL_CARD.md").unlink()
    with pytest.raises(VerificationError, match="MODEL_CARD.md removed after signing"):
        signing.verify_model(model, bundle, trust(keys))


def test_another_models_signature_is_refused(tmp_path: Path, signed: tuple[Path, Path], keys: dict[str, Path]) -> None:
    model, bundle = signed
    other = write_model(tmp_path / "other-model", seed=1)
    with pytest.raises(VerificationError, match="changed after signing"):
        signing.verify_model(other, bundle, trust(keys))


def test_signature_by_untrusted_key(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = write_model(tmp_path / "model")
    bundle = tmp_path / "model.sig"
    signing.sign_model(model, bundle, private_key=keys["other_private"])
    with pytest.raises(VerificationError, match="not trusted"):
        signing.verify_model(model, bundle, trust(keys))
    # Forge the key hint to name the trusted key: the signature itself still does not verify.
    document = json.loads(bundle.read_text())
    document["verificationMaterial"]["publicKey"]["hint"] = signing.key_hint(keys["public"].read_bytes())
    bundle.write_text(json.dumps(document))
    with pytest.raises(VerificationError):
        signing.verify_model(model, bundle, trust(keys))


def test_altered_statement_in_bundle(signed: tuple[Path, Path], keys: dict[str, Path]) -> None:
    model, bundle = signed
    document = json.loads(bundle.read_text())
    statement = json.loads(base64.b64decode(document["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    document["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    bundle.write_text(json.dumps(document))
    with pytest.raises(VerificationError):
        signing.verify_model(model, bundle, trust(keys))


@pytest.mark.parametrize("mangle", [
    lambda raw: raw[: len(raw) // 2],
    lambda raw: b"",
    lambda raw: b"[1, 2, 3]",
    lambda raw: raw.replace(b'"dsseEnvelope"', b'"somethingElse"'),
    lambda raw: raw.replace(b'"publicKey"', b'"mysteryKey"'),
])
def test_truncated_or_malformed_bundle(signed: tuple[Path, Path], keys: dict[str, Path], mangle) -> None:  # type: ignore[no-untyped-def]
    model, bundle = signed
    bundle.write_bytes(mangle(bundle.read_bytes()))
    with pytest.raises(VerificationError):
        signing.verify_model(model, bundle, trust(keys))


def test_signature_is_never_written_into_the_model(signed: tuple[Path, Path], keys: dict[str, Path]) -> None:
    model, _ = signed
    with pytest.raises(BadInput, match="outside the model directory"):
        signing.sign_model(model, model / "model.sig", private_key=keys["private"])


def test_keyless_without_identity_is_a_clear_refusal(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model")
    with pytest.raises(ConfigurationError, match="needs an OIDC identity"):
        signing.sign_model_keyless(model, tmp_path / "model.sig", environ={})
    assert not (tmp_path / "model.sig").exists()


def test_signing_resource_chooses_keyless_by_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from resources.security import SigningResource

    config_dir = tmp_path / "config"
    config_dir.mkdir()
    cfg = yaml.safe_load((REPO / "secure_ml" / "config" / "security.yaml").read_text())
    cfg["signing"]["method"] = "sigstore"
    (config_dir / "security.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.delenv("SIGSTORE_ID_TOKEN", raising=False)
    resource = SigningResource(home=str(tmp_path / "home"), config_dir=str(config_dir))
    assert resource.method() == "sigstore"
    with pytest.raises(ConfigurationError, match="OIDC identity"):
        resource.sign_files(sha256_tree(write_model(tmp_path / "model")), tmp_path / "model.sig")
    assert "pem" not in repr(resource).lower()
    # auto: no identity here, so the local key; with a token, Sigstore (which needs the network).
    cfg["signing"]["method"] = "auto"
    (config_dir / "security.yaml").write_text(yaml.safe_dump(cfg))
    assert resource.method() == "key"
    monkeypatch.setenv("SIGSTORE_ID_TOKEN", "an-identity-token")
    assert resource.method() == "sigstore"
    with pytest.raises(ConfigurationError, match="Sigstore keyless signing failed"):
        resource.sign_files(sha256_tree(tmp_path / "model"), tmp_path / "model.sig")
    assert not (tmp_path / "model.sig").exists()


def test_real_sigstore_bundle_verifies_offline(tmp_path: Path) -> None:
    model = tmp_path / "v1.1.0-sigstore"
    model.mkdir()
    (model / "signme-1").write_bytes(b"signme-1")
    (model / "signme-2").write_bytes(b"signme-2")
    bundle = tmp_path / "model.sig"
    bundle.write_text(SIGSTORE_BUNDLE)
    verified = signing.verify_model(model, bundle, signing.TrustPolicy.of(identities=[SIGSTORE_IDENTITY]))
    assert verified.method == "sigstore" and set(verified.files) == {"signme-1", "signme-2"}
    with pytest.raises(VerificationError, match="SANs do not match"):
        signing.verify_model(model, bundle, signing.TrustPolicy.of(
            identities=[("mallory@example.com", SIGSTORE_IDENTITY[1])]))
    with pytest.raises(VerificationError, match="no identity is trusted"):
        signing.verify_model(model, bundle, signing.TrustPolicy.of(public_keys=[]))
    (model / "signme-2").write_bytes(b"signme-3")
    with pytest.raises(VerificationError, match="signme-2 changed after signing"):
        signing.verify_model(model, bundle, signing.TrustPolicy.of(identities=[SIGSTORE_IDENTITY]))


def test_cli_verify_model(signed: tuple[Path, Path], keys: dict[str, Path], home: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    model, bundle = signed
    assert cli(["verify-model", str(model), "--signature", str(bundle), "--public-key", str(keys["public"])]) == 0
    assert "verified: 3 files" in capsys.readouterr().out
    assert cli(["verify-model", str(model), "--signature", str(bundle),
                "--public-key", str(keys["other_public"])]) == 1
    assert "not trusted" in capsys.readouterr().err
    # Without flags, trust comes from security.yaml (the home's own key), not from the bundle.
    assert cli(["verify-model", str(model), "--signature", str(bundle)]) == 1
    assert cli(["verify-model", str(model), "--signature", str(bundle), "--identity", "x"]) == 2
    actions = [e["action"] for e in Settings.from_env().audit_log().entries()]
    assert actions.count("verify.model") == 3


def _payload(bundle: Path) -> dict:  # type: ignore[type-arg]
    return signing.signed_payload(json.loads(bundle.read_bytes()))


def test_signing_custody_digests_is_signing_the_directory(tmp_path: Path, keys: dict[str, Path]) -> None:
    """The manifest signed from digests is the one model-signing builds by hashing the directory."""
    from model_signing import hashing
    from model_signing import signing as upstream

    model = write_model(tmp_path / "model")
    (model / "sub").mkdir()
    (model / "sub" / ".gitattributes").write_text("* binary\n")  # git paths are covered too
    ours, theirs = tmp_path / "ours.sig", tmp_path / "theirs.sig"
    signing.sign_files(sha256_tree(model), ours, private_key=keys["private"], model_name="model")
    upstream.Config().use_elliptic_key_signer(private_key=keys["private"]).set_hashing_config(
        hashing.Config().use_file_serialization().set_ignored_paths(paths=[], ignore_git_paths=False)
    ).sign(model, theirs)
    assert _payload(ours) == _payload(theirs)
    assert len(_payload(ours)["predicate"]["resources"]) == 4
    verified = signing.verify_model(model, ours, trust(keys))
    assert verified.files == sha256_tree(model)
    # The upstream CLI recomputes the digests and accepts it.
    result = subprocess.run([str(UPSTREAM_CLI), "verify", "key", str(model), "--signature", str(ours),
                             "--public_key", str(keys["public"]), "--no-ignore-git-paths"], timeout=120,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_digests_that_are_not_the_files_do_not_verify(tmp_path: Path, keys: dict[str, Path]) -> None:
    model = write_model(tmp_path / "model")
    files = sha256_tree(model)
    files["config.json"] = "0" * 64  # a custody record that does not describe these bytes
    bundle = tmp_path / "model.sig"
    signing.sign_files(files, bundle, private_key=keys["private"])
    with pytest.raises(VerificationError, match="config.json changed after signing"):
        signing.verify_model(model, bundle, trust(keys))
    del files["config.json"]
    signing.sign_files(files, bundle, private_key=keys["private"])
    with pytest.raises(VerificationError, match="config.json"):
        signing.verify_model(model, bundle, trust(keys))


@pytest.mark.parametrize(("files", "reason"), [
    ({}, "nothing to sign"),
    ({"/etc/passwd": "a" * 64}, "not a plain relative path"),
    ({"../model.safetensors": "a" * 64}, "not a plain relative path"),
    ({"a//b": "a" * 64}, "not a plain relative path"),
    ({"model.safetensors": "A" * 64}, "not a SHA-256 hex string"),
    ({"model.safetensors": "ab" * 16}, "not a SHA-256 hex string"),
    ({"model.safetensors": None}, "not a SHA-256 hex string"),
])
def test_malformed_digests_are_refused_before_signing(tmp_path: Path, keys: dict[str, Path], files, reason) -> None:  # type: ignore[no-untyped-def]
    bundle = tmp_path / "model.sig"
    with pytest.raises(BadInput, match=reason):
        signing.sign_files(files, bundle, private_key=keys["private"])
    with pytest.raises(BadInput, match=reason):
        signing.sign_files_keyless(files, bundle, identity_token="a-token")
    assert not bundle.exists()


def test_signing_a_stored_model_reads_no_model_bytes(tmp_path: Path, keys: dict[str, Path], home: Path) -> None:
    """A model in the artifact store is signed from its manifest; verification of the decrypted
    copy hashes every byte, and a stored file that was swapped is refused on the way out."""
    from secure_ml.errors import IntegrityError

    store = Settings.from_env().artifact_store()
    model = write_model(tmp_path / "model")
    tree = store.put_tree(model)
    files = store.tree_files(tree.sha256)
    assert files == sha256_tree(model)
    bundle = tmp_path / "model.sig"
    signing.sign_files(files, bundle, private_key=keys["private"])
    store.get_tree(tree.sha256, tmp_path / "out")
    assert signing.verify_model(tmp_path / "out", bundle, trust(keys)).files == files
    # Swap one stored object for another's ciphertext: the store refuses it before anyone verifies.
    victim = store.path_for(files["config.json"])
    victim.chmod(0o600)
    victim.write_bytes(store.path_for(files["MODEL_CARD.md"]).read_bytes())
    with pytest.raises(IntegrityError):
        store.get_tree(tree.sha256, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
