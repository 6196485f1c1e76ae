"""The node: trio shell around the protocol, libp2p transport, SQLite storage, RPC.

Built by the node issue.
"""
