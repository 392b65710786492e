"""The trusted task manager: keys, MM-obfuscation, Freivalds verification (and, later, training).

Everything here runs inside the TEE; nothing in it opens a socket.
"""
