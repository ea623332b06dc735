//! Client side: the site agent ([`reporter`]), the dashboard tools and the national simulation.
