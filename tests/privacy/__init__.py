"""Tests of fedjaxpriv.privacy."""
