"""Server-side conversations: state, persistence, context fitting and exact-token continuation."""
