"""wcd on a Ray cluster: `serve run wcd.serve:app config=/etc/wcd/wcd.yaml`.

Needs the `ray` extra (`pip install 'wcd[ray]'`); the daemon and wcctl never
import this package.
"""


def app(args: dict[str, str]):
    """Serve's application builder (deployments imports Ray, so it is
    imported only when an application is built)."""
    from wcd.serve.deployments import app as build

    return build(args)
