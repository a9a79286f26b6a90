/* The fault-injecting backend lives in the engine (daemon/backend/fake_backend.h) so kasminad's
 * fault-injection option can use it; tests include it through this name. */
#pragma once
#include "backend/fake_backend.h"
