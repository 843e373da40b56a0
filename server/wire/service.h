// The gRPC face of the engine: attnd.v1.Attention on the callback API. One named handler per
// RPC converts the request (server/wire/convert.h), hands it to the engine, and from the
// engine's reply fills the response, records the call's metrics and finishes its reactor.
#ifndef ATTND_SERVER_WIRE_SERVICE_H_
#define ATTND_SERVER_WIRE_SERVICE_H_

#include "attnd/v1/attention.grpc.pb.h"
#include "server/engine/engine.h"
#include "server/metrics/metrics.h"
#include "server/wire/unix_listener.h"

namespace attnd {

class AttentionService final : public v1::Attention::CallbackService {
 public:
  // peers: who is at the other end of each Unix-socket connection (nullptr: no Unix socket);
  // must outlive the service.
  AttentionService(Engine* engine, Metrics* metrics, const PeerTable* peers = nullptr)
      : engine_(engine), metrics_(metrics), peers_(peers) {}

  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* ctx,
                                          const v1::GetServerInfoRequest* req,
                                          v1::ServerInfo* resp) override;
  grpc::ServerUnaryReactor* GetStats(grpc::CallbackServerContext* ctx,
                                     const v1::GetStatsRequest* req, v1::Stats* resp) override;
  grpc::ServerUnaryReactor* RegisterCudaRegion(grpc::CallbackServerContext* ctx,
                                               const v1::RegisterCudaRegionRequest* req,
                                               v1::RegisterRegionResponse* resp) override;
  grpc::ServerUnaryReactor* RegisterHostRegion(grpc::CallbackServerContext* ctx,
                                               const v1::RegisterHostRegionRequest* req,
                                               v1::RegisterRegionResponse* resp) override;
  grpc::ServerUnaryReactor* UnregisterRegion(grpc::CallbackServerContext* ctx,
                                             const v1::UnregisterRegionRequest* req,
                                             v1::UnregisterRegionResponse* resp) override;
  grpc::ServerUnaryReactor* ListRegions(grpc::CallbackServerContext* ctx,
                                        const v1::ListRegionsRequest* req,
                                        v1::ListRegionsResponse* resp) override;
  grpc::ServerUnaryReactor* RegisterCudaEvent(grpc::CallbackServerContext* ctx,
                                              const v1::RegisterCudaEventRequest* req,
                                              v1::RegisterCudaEventResponse* resp) override;
  grpc::ServerUnaryReactor* UnregisterCudaEvent(grpc::CallbackServerContext* ctx,
                                                const v1::UnregisterCudaEventRequest* req,
                                                v1::UnregisterCudaEventResponse* resp) override;
  grpc::ServerUnaryReactor* CreateSequence(grpc::CallbackServerContext* ctx,
                                           const v1::CreateSequenceRequest* req,
                                           v1::SequenceInfo* resp) override;
  grpc::ServerUnaryReactor* ForkSequence(grpc::CallbackServerContext* ctx,
                                         const v1::ForkSequenceRequest* req,
                                         v1::SequenceInfo* resp) override;
  grpc::ServerUnaryReactor* TruncateSequence(grpc::CallbackServerContext* ctx,
                                             const v1::TruncateSequenceRequest* req,
                                             v1::SequenceInfo* resp) override;
  grpc::ServerUnaryReactor* ReleaseSequence(grpc::CallbackServerContext* ctx,
                                            const v1::ReleaseSequenceRequest* req,
                                            v1::ReleaseSequenceResponse* resp) override;
  grpc::ServerUnaryReactor* GetSequence(grpc::CallbackServerContext* ctx,
                                        const v1::GetSequenceRequest* req,
                                        v1::SequenceInfo* resp) override;
  grpc::ServerUnaryReactor* ListSequences(grpc::CallbackServerContext* ctx,
                                          const v1::ListSequencesRequest* req,
                                          v1::ListSequencesResponse* resp) override;
  grpc::ServerUnaryReactor* Append(grpc::CallbackServerContext* ctx,
                                   const v1::AppendRequest* req,
                                   v1::AppendResponse* resp) override;
  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* ctx,
                                    const v1::AttentionRequest* req,
                                    v1::AttentionResponse* resp) override;
  grpc::ServerUnaryReactor* Decode(grpc::CallbackServerContext* ctx,
                                   const v1::AttentionRequest* req,
                                   v1::AttentionResponse* resp) override;
  grpc::ServerBidiReactor<v1::StreamRequest, v1::StreamResponse>* Stream(
      grpc::CallbackServerContext* ctx) override;
  grpc::ServerUnaryReactor* ExportKv(grpc::CallbackServerContext* ctx,
                                     const v1::ExportKvRequest* req,
                                     v1::ExportKvResponse* resp) override;
  grpc::ServerUnaryReactor* ImportKv(grpc::CallbackServerContext* ctx,
                                     const v1::ImportKvRequest* req,
                                     v1::ImportKvResponse* resp) override;

 private:
  Engine* engine_;
  Metrics* metrics_;
  const PeerTable* peers_;
};

}  // namespace attnd

#endif  // ATTND_SERVER_WIRE_SERVICE_H_
