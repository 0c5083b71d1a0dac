"""Certificates and keys for the local control plane, made with the openssl CLI.

- a CA (`ca.crt`/`ca.key`), also used by the controller-manager to sign CSRs;
- the apiserver serving certificate for 127.0.0.1/localhost and the in-cluster names;
- an admin client certificate (CN=kubetune-admin, O=system:masters);
- the service-account signing key pair (`sa.key`/`sa.pub`).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVING_DNS = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
               "kubernetes.default.svc.cluster.local"]


@dataclass(frozen=True)
class ClusterPKI:
    """Paths of the generated files."""

    dir: Path

    def __getattr__(self, name: str) -> Path:  # ca_crt -> dir/ca.crt
        if name.startswith("_"):
            raise AttributeError(name)
        stem, _, ext = name.rpartition("_")
        return self.dir / f"{stem.replace('_', '-')}.{ext}"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=path.parent)


def _signed_cert(d: Path, name: str, subject: str, extensions: str, days: int) -> None:
    _ec_key(d / f"{name}.key")
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", str(days), "-sha256", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d)


def generate_pki(directory: Path, service_ip: str = "10.96.0.1", days: int = 30) -> ClusterPKI:
    """Write CA, apiserver serving cert, admin client cert and service-account keys into directory."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _ec_key(d / "ca.key")
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=kubetune-dev-ca", "-days", str(days),
             "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature", "-out", "ca.crt", cwd=d)
    sans = ",".join([f"DNS:{n}" for n in SERVING_DNS] + ["IP:127.0.0.1", f"IP:{service_ip}"])
    _signed_cert(d, "apiserver", "/CN=kube-apiserver",
                 "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                 f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n", days)
    _signed_cert(d, "admin", "/O=system:masters/CN=kubetune-admin",
                 "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                 "extendedKeyUsage=clientAuth\n", days)
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=d)
    _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    return ClusterPKI(d)


def generate_loopback_serving_cert(pki: ClusterPKI, name: str, days: int = 30) -> tuple[Path, Path]:
    """A serving certificate for 127.0.0.1/localhost signed by the cluster CA (for webhooks that the
    apiserver calls on loopback); returns (cert, key) paths in the PKI directory."""
    _signed_cert(pki.dir, name, f"/CN={name}",
                 "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                 "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n", days)
    return pki.dir / f"{name}.crt", pki.dir / f"{name}.key"
