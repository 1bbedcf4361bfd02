"""The applications built on the library: the command line (`cli.py`, `common.py`), the demo (`demo.py`,
`demo_page.py`) and the I2P benchmark harness (`i2p/`). Nothing in the library imports them."""
