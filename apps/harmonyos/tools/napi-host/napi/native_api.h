// Host-build stand-in for OpenHarmony's <napi/native_api.h>: OHOS NAPI is the Node-API surface
// (napi_* functions with Node's names, types and semantics), so on Linux ort_engine.cpp compiles
// against Node's own declarations, from the pinned npm package node-api-headers (include dir put
// on the include path by tools/build-napi-host.mjs) and runs inside Node. Only the host build
// (tools/napi-host) sees this file; the DevEco build uses the OHOS SDK's header.
#ifndef MINICPMV_EDGE_NAPI_NATIVE_API_SHIM_H_
#define MINICPMV_EDGE_NAPI_NATIVE_API_SHIM_H_

// Node-API 8: the level OHOS API 13's NAPI covers for the calls used (bigint, async work, promises).
#ifndef NAPI_VERSION
#define NAPI_VERSION 8
#endif

#include <node_api.h>

#endif  // MINICPMV_EDGE_NAPI_NATIVE_API_SHIM_H_
