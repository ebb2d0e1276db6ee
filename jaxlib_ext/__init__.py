"""The integration layer: reference model, data, train state and step, cost accounting, demo.

Submodules are imported explicitly (``from jaxlib_ext import train``) so that importing the
package stays cheap and the demo can configure devices before JAX starts its backend.
"""
