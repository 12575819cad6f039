"""The discrete-event simulator behind ``gfdit simulate``: real scheduler, modelled workers."""
