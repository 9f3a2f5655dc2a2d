"""Small helpers every image shares (the lookup service's, the console's, the batch side's): one-line and
printable error text, JSON-safe values, what both HTTP apps log and label alike, and the session blend.
Standard library only; serving/ and console/ never import jobs/, so what they share with it lives here."""
