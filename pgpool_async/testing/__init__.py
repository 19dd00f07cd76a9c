"""Test tools: throwaway servers, fault injection (user space and real network)."""
