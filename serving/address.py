"""HOST:PORT written the way gRPC targets and URLs need it."""


def host_port(host: str, port: int) -> str:
    """`host`:`port`, with an IPv6 literal in brackets ([::1]:8001): gRPC reads "::1:8001" as
    another address altogether."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
