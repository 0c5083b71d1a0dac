"""kubetune_dev: development tools for kubetune (the local control plane, process nodes, the demo).

Never imported by the product packages (`kubetune`, `kubetune_trainer`); it imports them freely."""
