"""The pool's event-loop-side policies (bookkeeping only, no I/O on the loop)."""
