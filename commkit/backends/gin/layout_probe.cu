
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include "csrc/net_gin.cuh"

#define FIELD(type, name) printf(#type "." #name " %zu %zu\n", offsetof(type, name), sizeof(((type*)0)->name))

using commkit::GinNet;
using commkit::InterLayout;

// The GIN backend (ncclNetDeviceType) of each connection (NCCL >= 2.29: ginNetDeviceTypes, used
// entries: ginConnectionCount) or context (2.28: ginTypes, ginContextCount): ncclDevComm.ginBackends.
template <typename T, typename = void>
struct HasNetDeviceTypes : std::false_type {};
template <typename T>
struct HasNetDeviceTypes<T, std::void_t<decltype(&T::ginNetDeviceTypes)>> : std::true_type {};
#define DEV_COMM_FIELD_AS(label, name) \
    printf("ncclDevComm." label " %zu %zu\n", offsetof(T, name), sizeof(((T*)0)->name))
template <typename T>
void print_backends() {
    if constexpr (HasNetDeviceTypes<T>::value) {
        DEV_COMM_FIELD_AS("ginBackends", ginNetDeviceTypes);
        DEV_COMM_FIELD_AS("ginBackendCount", ginConnectionCount);
    } else {
        DEV_COMM_FIELD_AS("ginBackends", ginTypes);
        DEV_COMM_FIELD_AS("ginBackendCount", ginContextCount);
    }
}

int main() {
#ifdef NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER
    ncclDevCommRequirements reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;  // NCCL >= 2.29: mandatory
#else
    ncclDevCommRequirements reqs;
    memset(&reqs, 0, sizeof(reqs));
#endif
#if NCCL_VERSION_CODE >= 22907
    reqs.ginConnectionType = NCCL_GIN_CONNECTION_FULL;  // ginForceEnable is deprecated since 2.29.7
#else
    reqs.ginForceEnable = true;
#endif
    printf("version_code %d\n", (int)NCCL_VERSION_CODE);
    printf("unique_id_bytes %d\n", (int)NCCL_UNIQUE_ID_BYTES);
    printf("win_coll_symmetric %d\n", (int)NCCL_WIN_COLL_SYMMETRIC);
    printf("win_required_alignment %d\n", (int)NCCL_WIN_REQUIRED_ALIGNMENT);
    printf("strong_signals %d\n", (int)COMMKIT_GIN_HAS_STRONG_SIGNALS);
    printf("net_slots %d\n", commkit::kNetSlots);
    printf("sizeof.ncclDevComm %zu %zu\n", sizeof(ncclDevComm), alignof(ncclDevComm));
    printf("sizeof.ncclDevCommRequirements %zu %zu\n", sizeof(reqs), alignof(ncclDevCommRequirements));
    printf("sizeof.GinNet %zu %zu\n", sizeof(GinNet), alignof(GinNet));
    printf("sizeof.InterLayout %zu %zu\n", sizeof(InterLayout), alignof(InterLayout));
    FIELD(ncclDevComm, rank);
    FIELD(ncclDevComm, nRanks);
    FIELD(ncclDevComm, ginContextCount);
    print_backends<ncclDevComm>();
    FIELD(ncclDevCommRequirements, ginContextCount);
    FIELD(ncclDevCommRequirements, ginSignalCount);
    FIELD(ncclDevCommRequirements, ginCounterCount);
    FIELD(GinNet, comm);
    FIELD(GinNet, window);
    FIELD(GinNet, base);
    FIELD(GinNet, layout);
    FIELD(InterLayout, num_nodes);
    FIELD(InterLayout, gpus_per_node);
    FIELD(InterLayout, max_channels);
    FIELD(InterLayout, nvl_slot_bytes);
    FIELD(InterLayout, net_slot_bytes);
    FIELD(InterLayout, signals_offset);
    FIELD(InterLayout, nvl_ring_offset);
    FIELD(InterLayout, net_ring_offset);
    FIELD(InterLayout, net_stage_offset);
    printf("requirements_hex ");
    const unsigned char* bytes = reinterpret_cast<const unsigned char*>(&reqs);
    for (size_t i = 0; i < sizeof(reqs); ++i)
        printf("%02x", bytes[i]);
    printf("\n");
    return 0;
}
