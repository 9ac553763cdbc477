"""EtcdStore when etcd goes away: watches resume across a restart without gaps, give up after
reconnect_timeout, fail over between the members of a 3-member cluster; and TLS to etcd."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import virtplane.store
from virtplane.store import etcd, interface
from virtplane.testing.etcd import ClientTLS, EtcdCluster, etcd_binary

PUT = interface.EventType.PUT

needs_etcd = pytest.mark.skipif(etcd_binary() is None, reason="etcd is not installed (Debian package: etcd-server)")


async def test_watch_resumes_across_an_etcd_restart(private_etcd: EtcdCluster) -> None:
    s = etcd.EtcdStore(private_etcd.endpoints, retain_seconds=None, reconnect_timeout=30)
    await s.start()
    try:
        base = await s.current_revision()
        watch = s.watch("/a/", after_revision=base)
        before = [await s.create(f"/a/before-{i}", b"v") for i in range(5)]
        it = aiter(watch)
        async with asyncio.timeout(5):
            assert [(await anext(it)).kv for _ in range(3)] == before[:3]  # two still unconsumed

        member = private_etcd.members[0]
        await asyncio.to_thread(member.kill)
        with pytest.raises(interface.StoreError) as info:
            await s.create("/a/during", b"v")
        assert isinstance(info.value.__cause__, aiohttp.ClientError)  # the root cause, not a guess
        await asyncio.sleep(0.3)  # the watch tries, and keeps trying, to reconnect
        await asyncio.to_thread(private_etcd.restart, member)

        after = [await s.create(f"/a/after-{i}", b"v") for i in range(5)]
        async with asyncio.timeout(10):
            rest = [(await anext(it)).kv for _ in range(7)]
        assert rest == before[3:] + after  # nothing lost, nothing twice, in order
        await watch.close()
    finally:
        await s.close()


async def test_watch_gives_up_after_reconnect_timeout(private_etcd: EtcdCluster) -> None:
    s = etcd.EtcdStore(private_etcd.endpoints, retain_seconds=None, reconnect_timeout=0.5, connect_timeout=0.5)
    await s.start()
    try:
        watch = s.watch("/a/", after_revision=await s.current_revision())
        await asyncio.sleep(0.1)
        await asyncio.to_thread(private_etcd.members[0].kill)
        with pytest.raises(interface.WatchClosedError, match="re-list") as info:
            async with asyncio.timeout(10):
                await anext(aiter(watch))
        assert isinstance(info.value.__cause__, interface.StoreError | aiohttp.ClientError)
        assert not s._feeds
    finally:
        await s.close()


@needs_etcd
async def test_three_members_lose_one(tmp_path: Path) -> None:
    """HA: the member the store talks to dies; requests and the watch move to the others, and the
    watch delivers every acknowledged write exactly once, in order."""
    cluster = await asyncio.to_thread(EtcdCluster(tmp_path / "etcd", size=3).start)
    s = etcd.EtcdStore(cluster.endpoints, retain_seconds=None, request_timeout=5, connect_timeout=1)
    try:
        await s.start()
        base = await s.current_revision()
        watch = s.watch("/a/", after_revision=base)
        acked: list[interface.KeyValue] = []
        failed = 0
        stop = asyncio.Event()

        async def writer() -> None:
            nonlocal failed
            i = 0
            while not stop.is_set():
                try:
                    acked.append(await s.create(f"/a/{i:05d}", b"v"))
                except interface.StoreError:
                    failed += 1  # unacknowledged (may still have been applied): the watch tells
                    await asyncio.sleep(0.05)
                i += 1

        task = asyncio.create_task(writer())
        await asyncio.sleep(0.5)
        assert s._preferred == 0
        await asyncio.to_thread(cluster.members[0].kill)
        await asyncio.sleep(3)  # an election, if it was the leader, and writes on the others
        stop.set()
        await task
        assert s._preferred != 0
        final = await s.list("/a/")
        events: list[interface.WatchEvent] = []
        it = aiter(watch)
        async with asyncio.timeout(15):
            while not events or events[-1].revision < final.revision:
                events.append(await anext(it))
        assert [e.kv for e in events] == final.kvs  # each key created once: the watch is the store
        assert {kv.key for kv in acked} <= {kv.key for kv in final.kvs}  # nothing acknowledged lost
        assert len(acked) > 20 and acked[-1].mod_revision > base
        await watch.close()
    finally:
        await s.close()
        await asyncio.to_thread(cluster.stop)


# -- TLS -----------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[Path, Path]:
    key_path = path.with_suffix(".key")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key_path


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a serving certificate for 127.0.0.1 and a client certificate, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test-ca")).issuer_name(_name("test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    files = {"ca": _write(directory / "ca.crt", ca_key, ca)[0]}
    # etcd's gateway dials etcd's own gRPC port with the serving certificate as its client
    # certificate: with client-cert-auth on, that certificate needs clientAuth too.
    usages = {"server": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
              "client": [ExtendedKeyUsageOID.CLIENT_AUTH]}
    for name, usage in usages.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                               critical=False)
                .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
                .sign(ca_key, hashes.SHA256()))
        files[f"{name}_cert"], files[f"{name}_key"] = _write(directory / f"{name}.crt", key, cert)
    return files


@needs_etcd
async def test_tls_with_client_certificates(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    health = ssl.create_default_context(cafile=str(pki["ca"]))
    health.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    cluster = EtcdCluster(tmp_path / "etcd", tls=ClientTLS(pki["server_cert"], pki["server_key"], pki["ca"]),
                          client_ssl=health)
    await asyncio.to_thread(cluster.start)
    try:
        hosts = f"127.0.0.1:{cluster.members[0].client_port}"
        url = f"etcd://{hosts}?cacert={pki['ca']}&cert={pki['client_cert']}&key={pki['client_key']}&retain_seconds=none"
        s = virtplane.store.open_store(url)
        await s.start()
        try:
            base = await s.current_revision()
            watch = s.watch("/a/", after_revision=base)
            kv = await s.create("/a/x", b"over tls")
            async with asyncio.timeout(5):
                assert (await anext(aiter(watch))).kv == kv
            await watch.close()
        finally:
            await s.close()

        # Without a client certificate etcd refuses the handshake; plain http gets no gateway.
        for bad in (f"etcd://{hosts}?cacert={pki['ca']}", f"etcd://{hosts}?connect_timeout=2"):
            s = virtplane.store.open_store(bad)
            with pytest.raises(interface.StoreError) as info:
                await s.start()
            assert info.value.__cause__ is not None
        # A CA that did not sign etcd's certificate: the TLS error is the cause.
        (tmp_path / "other").mkdir()
        other = make_pki(tmp_path / "other")
        s = virtplane.store.open_store(f"etcd://{hosts}?cacert={other['ca']}")
        with pytest.raises(interface.StoreError) as info:
            await s.start()
        assert isinstance(info.value.__cause__, aiohttp.ClientConnectorCertificateError)
        # Missing files are a StoreError at start, naming the file.
        s = virtplane.store.open_store(f"etcd://{hosts}?cacert={tmp_path / 'nope.crt'}")
        with pytest.raises(interface.StoreError, match=r"nope\.crt"):
            await s.start()
    finally:
        await asyncio.to_thread(cluster.stop)
