"""oauth-relay: an SMTP relay that delivers to Exchange Online with OAuth2 (XOAUTH2)."""

__version__ = "0.1.0"
