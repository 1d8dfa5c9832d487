//! The automatic threshold: where a channel starts to pay off for the submitting core.
//! Placeholder replaced below.
