"""Test-only infrastructure: the real Envoy binary, fake identity providers and echo backends on loopback.

Nothing here may be imported by the ``controlplane`` package: the fakes mint tokens that a production control
plane must never trust. Import the submodules directly (``support.envoy``, ``support.fake_gitlab``, ...); this
package stays empty so that importing one helper does not start generating RSA keys for another.
"""
