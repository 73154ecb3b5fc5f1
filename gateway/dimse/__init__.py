"""DIMSE (PS3.7): command sets, message assembly and SOP class tables.

Sans-I/O: nothing here touches sockets, files or the reactor.

- :mod:`gateway.dimse.commands`: command set codec, status codes, builders.
- :mod:`gateway.dimse.message`: PDV reassembly and fragmentation.
- :mod:`gateway.dimse.sop`: UID constants, UID validation, classification.
"""
